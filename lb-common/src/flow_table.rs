//! The IPv4 connection table (`XLB_FLOWS4`): a set-associative array, not a kernel hash map.
//!
//! An established flow's packet costs what its table lookup costs in memory traffic. The
//! kernel's LRU hash map touches a bucket, then an element of 136 bytes (list and LRU
//! nodes, the 40-byte key, the value) on two or three more cache lines, in a 150 MB table:
//! about four cache and two TLB misses per packet once flows outnumber the caches. Here a
//! flow's set is found by arithmetic and holds everything the forward path reads: the eight
//! ways' keys on one aligned pair of cache lines (fetched together), their states on the
//! next four, 384 bytes in all. A lookup reads the keys and the one state they match.
//!
//! IPv4 is the common case and its 5-tuple fits a 16-byte key. IPv6 flows keep the kernel's
//! hash map (`XLB_CONNTRACK`), whose 40-byte keys would leave room for too few ways.
//!
//! Eviction is per set: a new flow takes an empty way, else the way seen longest ago. A set
//! can fill before the table does: with flows spread at random (Poisson), eight ways per set
//! lose one flow in four million to eviction with a tenth of the table's ways in use, one in
//! 7,000 at a quarter, one in 120 at half (four ways would lose one in 230 at a quarter). An
//! evicted flow's next
//! packet is balanced again by its VIP's ring, which picks the same backend unless the ring
//! changed since; size the table at twice the flows it must hold or more.
//!
//! Concurrency: one CPU's insert may meet another CPU's lookup of the same set. The writer
//! clears the way's key first and writes its new key last, so a reader matches either the
//! old flow with its old state or nothing, in the window where stores land in program order
//! (as on x86); a reader that already holds the old state may write its last-seen time or
//! closing bits into the new flow's, which shortens that entry's life at worst. Two CPUs
//! inserting into the same way at once leave one of them, or a key matching neither flow.

use crate::{
    FlowKey, FlowState,
    addr::v4_mapped,
    hash::{fmix64, ring_offset},
    parse::Parsed,
};

/// Ways per set: eight 16-byte keys fill an aligned pair of cache lines, which the CPU's
/// adjacent-line prefetch brings in together.
pub const FLOW_SET_WAYS: usize = 8;

/// Name of the global read-only variable holding the number of sets in `XLB_FLOWS4`.
pub const FLOW_SETS_SYMBOL: &str = "XLB_FLOW_SETS";
/// Name of the global read-only variable holding the `SetMultipliers` of the table's seed.
pub const FLOW_MULTIPLIERS_SYMBOL: &str = "XLB_FLOW_MULTIPLIERS";

/// Sets in an `XLB_FLOWS4` of `entries` ways (the agent's `--conntrack-entries`).
#[must_use]
pub const fn flow_sets(entries: u32) -> u32 {
    let sets = entries.div_ceil(FLOW_SET_WAYS as u32);
    if sets == 0 { 1 } else { sets }
}

/// `XLB_FLOWS4`'s size: its sets, then one more element that records the table's seed.
#[must_use]
pub const fn flow_table_entries(entries: u32) -> u32 {
    flow_sets(entries) + 1
}

/// Marks the element after a table's sets as the record of the table's seed ("xlb seed").
///
/// The seed a table's sets were placed with is kept in that element, which no flow's
/// `set_index` reaches. The seed is the table's own, chosen at random when the table is
/// made: unlike the cluster's flow-hash seed it never changes under the flows, so an
/// operator changing `--hash-seed` loses none, and a sender cannot aim flows at one set.
const SEED_MARK: u64 = u64::from_le_bytes(*b"xlb seed");

/// An IPv4 flow's 5-tuple in two words: source and destination address (network order, as
/// in the packet), then both ports (network order) and the protocol. All zero is an empty
/// way: no flow to a VIP has destination 0.0.0.0.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    pub addrs: u64,
    pub ports_proto: u64,
}

impl FlowKey4 {
    pub const EMPTY: Self = Self {
        addrs: 0,
        ports_proto: 0,
    };

    /// The key of an IPv4 flow given as IPv4-mapped addresses (the caller checks the family).
    #[inline(always)]
    #[must_use]
    pub const fn of(key: &FlowKey) -> Self {
        let (s, d) = (&key.src, &key.dst);
        let sport = key.sport_be.to_ne_bytes();
        let dport = key.dport_be.to_ne_bytes();
        Self {
            addrs: u64::from_ne_bytes([s[12], s[13], s[14], s[15], d[12], d[13], d[14], d[15]]),
            ports_proto: u64::from_ne_bytes([
                sport[0], sport[1], dport[0], dport[1], key.proto, 0, 0, 0,
            ]),
        }
    }

    /// The key of a parsed IPv4 packet's flow (the caller checks the family). Built from
    /// the parsed fields as they were stored (addresses as words, ports and protocol as
    /// themselves): a wide load of narrower stores just made would wait for them to drain.
    #[inline(always)]
    #[must_use]
    pub fn of_packet(p: &Parsed) -> Self {
        let (src, dst) = (
            p.src_words()[3].to_ne_bytes(),
            p.dst_words()[3].to_ne_bytes(),
        );
        let (sport, dport) = (p.sport_be.to_ne_bytes(), p.dport_be.to_ne_bytes());
        Self {
            addrs: u64::from_ne_bytes([
                src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3],
            ]),
            ports_proto: u64::from_ne_bytes([
                sport[0], sport[1], dport[0], dport[1], p.proto, 0, 0, 0,
            ]),
        }
    }

    /// The flow's `FlowKey` (IPv4-mapped addresses), as the rest of xlb names flows.
    #[must_use]
    pub const fn flow_key(&self) -> FlowKey {
        let a = self.addrs.to_ne_bytes();
        let p = self.ports_proto.to_ne_bytes();
        FlowKey {
            src: v4_mapped([a[0], a[1], a[2], a[3]]),
            dst: v4_mapped([a[4], a[5], a[6], a[7]]),
            sport_be: u16::from_ne_bytes([p[0], p[1]]),
            dport_be: u16::from_ne_bytes([p[2], p[3]]),
            proto: p[4],
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.addrs == 0 && self.ports_proto == 0
    }

    /// The set this flow lives in, of `sets`, in a table whose seed gave `multipliers`.
    ///
    /// Multiply-shift over the two words with multipliers drawn from the seed (Dietzfelbinger
    /// et al.): two independent multiplies and an add, then the top bits scaled to `sets`.
    /// The set's address waits on this hash, and a chain of finaliser rounds (as in
    /// `hash::flow_hash`) made that wait about 25 cycles; this one is under 10. A sender who
    /// does not know the seed cannot aim flows at a set.
    #[inline(always)]
    #[must_use]
    pub const fn set_index(&self, multipliers: &SetMultipliers, sets: u32) -> u32 {
        let h = self
            .addrs
            .wrapping_mul(multipliers.addrs)
            .wrapping_add(self.ports_proto.wrapping_mul(multipliers.ports_proto));
        ring_offset((h >> 32) as u32, sets)
    }
}

/// The odd multipliers of `FlowKey4::set_index` in a table of a given seed (see
/// `SEED_MARK`). Derived once, when the agent opens the table, and handed to the data path
/// as a global: no packet spends the finaliser rounds that turn a seed into them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetMultipliers {
    pub addrs: u64,
    pub ports_proto: u64,
}

impl SetMultipliers {
    #[must_use]
    pub const fn of_seed(seed: u32) -> Self {
        let s = seed as u64;
        Self {
            addrs: fmix64(s ^ 0x9e37_79b9_7f4a_7c15) | 1,
            ports_proto: fmix64(s ^ 0xc2b2_ae3d_27d4_eb4f) | 1,
        }
    }
}

/// Value of `XLB_FLOWS4`: one set. The keys share the first two cache lines, the states
/// follow.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSet {
    pub keys: [FlowKey4; FLOW_SET_WAYS],
    pub states: [FlowState; FLOW_SET_WAYS],
}

impl FlowSet {
    /// The state of `key`'s flow, if the set holds it.
    #[inline(always)]
    pub fn find(&mut self, key: &FlowKey4) -> Option<&mut FlowState> {
        // A loop of constant count: the compiler unrolls it, the verifier never sees it.
        let mut way = 0;
        while way < FLOW_SET_WAYS {
            if self.keys[way] == *key {
                return Some(&mut self.states[way]);
            }
            way += 1;
        }
        None
    }

    /// The way a new flow takes: an empty one, else the one whose flow was seen longest ago.
    /// While the set has room, the keys alone decide: no state line is read.
    #[inline(always)]
    #[must_use]
    pub fn victim(&self) -> usize {
        let mut way = 0;
        while way < FLOW_SET_WAYS {
            if self.keys[way].is_empty() {
                return way;
            }
            way += 1;
        }
        let mut chosen = 0;
        way = 1;
        while way < FLOW_SET_WAYS {
            if self.states[way].last_seen_ns < self.states[chosen].last_seen_ns {
                chosen = way;
            }
            way += 1;
        }
        chosen
    }

    /// Writes `key`'s flow: over its own way if the set holds it, else over `victim`'s.
    /// For the agent, which writes whole sets; the data path writes one way in place.
    pub fn put(&mut self, key: &FlowKey4, state: &FlowState) {
        let way = (0..FLOW_SET_WAYS)
            .find(|&w| self.keys[w] == *key)
            .unwrap_or_else(|| self.victim());
        self.keys[way] = *key;
        self.states[way] = *state;
    }

    /// The element that records a table's `seed` (see `SEED_MARK`).
    #[must_use]
    pub fn seed_record(seed: u32) -> Self {
        let mut record = Self::default();
        record.keys[0] = FlowKey4 {
            addrs: u64::from(seed),
            ports_proto: SEED_MARK,
        };
        record
    }

    /// The seed this element records, if it is a seed record.
    #[must_use]
    pub fn recorded_seed(&self) -> Option<u32> {
        let key = &self.keys[0];
        (key.ports_proto == SEED_MARK)
            .then(|| u32::try_from(key.addrs).ok())
            .flatten()
    }

    /// The flows the set holds, as `FlowKey`s.
    pub fn flows(&self) -> impl Iterator<Item = (FlowKey, FlowState)> + '_ {
        (0..FLOW_SET_WAYS)
            .filter(|&w| !self.keys[w].is_empty())
            .map(|w| (self.keys[w].flow_key(), self.states[w]))
    }
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;
    use crate::hash::tests::key;

    fn state(backend_id: u32, last_seen_ns: u64) -> FlowState {
        FlowState {
            backend_id,
            last_seen_ns,
            ..FlowState::default()
        }
    }

    #[test]
    fn a_packets_key_is_its_flows_key() {
        let k = key(40_000);
        let p = Parsed {
            src: k.src,
            dst: k.dst,
            sport_be: k.sport_be,
            dport_be: k.dport_be,
            proto: k.proto,
            ..Parsed::EMPTY
        };
        assert_eq!(FlowKey4::of_packet(&p), FlowKey4::of(&k));
        assert_eq!(FlowKey4::of_packet(&p).flow_key(), k);
    }

    #[test]
    fn a_set_is_two_key_lines_and_four_state_lines() {
        assert_eq!(size_of::<FlowKey4>(), 16);
        assert_eq!(size_of::<FlowSet>(), 384);
        assert_eq!(offset_of!(FlowSet, states), 128);
    }

    #[test]
    fn a_key_round_trips_and_is_never_empty() {
        let k = key(40_000);
        let k4 = FlowKey4::of(&k);
        assert_eq!(k4.flow_key(), k);
        assert!(!k4.is_empty());
        assert_eq!(k4.addrs.to_ne_bytes(), [10, 0, 0, 1, 192, 0, 2, 10]);
    }

    #[test]
    fn keys_differing_in_any_field_differ() {
        let base = key(40_000);
        let mut variants = vec![base];
        for change in 0..4 {
            let mut k = base;
            match change {
                0 => k.src[15] ^= 1,
                1 => k.dst[12] ^= 0x80,
                2 => k.dport_be ^= 1,
                _ => k.proto = crate::IPPROTO_UDP,
            }
            variants.push(k);
        }
        let keys: Vec<_> = variants.iter().map(FlowKey4::of).collect();
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn set_indexes_are_in_range_spread_and_seeded() {
        let sets = 1000;
        let mut hits = vec![0u32; sets as usize];
        for sport in 1..=50_000u16 {
            let i = FlowKey4::of(&key(sport)).set_index(&SetMultipliers::of_seed(7), sets);
            hits[i as usize] += 1;
        }
        // 50 flows per set on average: a uniform spread keeps every set within a few
        // standard deviations (about 7) of it.
        assert!(hits.iter().all(|&n| (15..=90).contains(&n)), "{hits:?}");
        let k = FlowKey4::of(&key(1234));
        let moved = (0..64)
            .filter(|&seed| {
                k.set_index(&SetMultipliers::of_seed(seed), 1 << 20)
                    != k.set_index(&SetMultipliers::of_seed(seed + 1), 1 << 20)
            })
            .count();
        assert!(moved > 60, "the seed decides the set: {moved}");
    }

    #[test]
    fn find_matches_only_the_exact_flow() {
        let mut set = FlowSet::default();
        let a = FlowKey4::of(&key(1));
        let b = FlowKey4::of(&key(2));
        set.put(&a, &state(7, 100));
        assert_eq!(set.find(&a).map(|s| s.backend_id), Some(7));
        assert!(set.find(&b).is_none());
    }

    #[test]
    fn new_flows_fill_empty_ways_then_evict_the_longest_unseen() {
        let mut set = FlowSet::default();
        let seen = [400u64, 100, 300, 200, 800, 700, 600, 500];
        for (i, seen) in (1u16..).zip(seen) {
            assert!(set.keys[set.victim()].is_empty());
            set.put(&FlowKey4::of(&key(i)), &state(u32::from(i), seen));
        }
        assert_eq!(set.flows().count(), FLOW_SET_WAYS);
        let ninth = FlowKey4::of(&key(9));
        set.put(&ninth, &state(9, 900));
        let held: Vec<u16> = set.flows().map(|(k, _)| u16::from_be(k.sport_be)).collect();
        assert_eq!(
            held,
            [1, 9, 3, 4, 5, 6, 7, 8],
            "flow 2, seen longest ago, made room"
        );
        // Writing a held flow again overwrites its own way.
        set.put(&ninth, &state(10, 1000));
        assert_eq!(set.flows().count(), FLOW_SET_WAYS);
        assert_eq!(set.find(&ninth).map(|s| s.backend_id), Some(10));
    }

    #[test]
    fn a_seed_record_reads_back_and_nothing_else_passes_for_one() {
        for seed in [0, 1, 0xdead_beef, u32::MAX] {
            assert_eq!(FlowSet::seed_record(seed).recorded_seed(), Some(seed));
        }
        assert_eq!(FlowSet::default().recorded_seed(), None);
        let mut set = FlowSet::default();
        set.put(&FlowKey4::of(&key(80)), &state(1, 1));
        assert_eq!(set.recorded_seed(), None, "a set holding a flow");
    }

    #[test]
    fn sets_cover_the_requested_ways() {
        assert_eq!(flow_sets(0), 1);
        assert_eq!(flow_sets(1), 1);
        assert_eq!(flow_sets(8), 1);
        assert_eq!(flow_sets(9), 2);
        assert_eq!(flow_sets(1 << 20), 1 << 17);
        assert_eq!(flow_table_entries(1 << 20), (1 << 17) + 1);
    }
}
