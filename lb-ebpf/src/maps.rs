//! The maps, declared once; their names, sizes and layouts come from `lb_common`.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, CONNTRACK_ENTRIES, CachedHop, Counter, DEFAULT_HASH_SEED, DEFAULT_MAX_VIPS,
    DEFAULT_RING_SIZE, EncapSettings, EndpointVip, FlowKey, FlowState, HANDSHAKE_ENTRIES_MIN,
    MAX_BACKENDS, MAX_EGRESS_PORTS, NextHop, PORT_ENTRIES, ReverseNat, TrafficCounters, VipInfo,
    VipKey,
    addr::is_v4_mapped,
    flow_table::{FlowKey4, FlowSet, SetMultipliers, flow_sets, flow_table_entries},
    parse::Parsed,
};

/// Flow-hash seed; the agent sets it at load time (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
pub static XLB_HASH_SEED: Global<u32> = Global::new(DEFAULT_HASH_SEED);

#[map(name = "XLB_VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// All VIPs' rings, each VIP owning two `ring_size` halves (double buffer).
#[map(name = "XLB_MAGLEV")]
pub static MAGLEV: Array<u32> =
    Array::with_max_entries(DEFAULT_MAX_VIPS * 2 * DEFAULT_RING_SIZE, 0);

#[map(name = "XLB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The node's direct-server-return settings (outer source addresses, GUE port): read when
/// a tunnelled backend's hop is resolved, not per packet.
#[map(name = "XLB_ENCAP")]
pub static ENCAP: Array<EncapSettings> = Array::with_max_entries(1, 0);

/// Each backend's next hop, as each CPU last resolved it (see `lb_common::CachedHop`).
#[map(name = "XLB_BEHOPS")]
pub static BACKEND_HOPS: PerCpuArray<CachedHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Sets in `XLB_FLOWS4`; the agent sets it with the table's size at load time.
#[unsafe(no_mangle)]
pub static XLB_FLOW_SETS: Global<u32> = Global::new(flow_sets(CONNTRACK_ENTRIES));

/// The set-index multipliers of `XLB_FLOWS4`'s own seed, set by the agent at load (the
/// table records the seed after its sets: `lb_common::flow_table::FlowSet::seed_record`).
#[unsafe(no_mangle)]
pub static XLB_FLOW_MULTIPLIERS: Global<SetMultipliers> = Global::new(SetMultipliers::of_seed(0));

/// IPv4 flows, set-associative (`lb_common::flow_table`). Mappable, so the kernel places its
/// values from a page boundary: every set starts on a cache line.
#[map(name = "XLB_FLOWS4")]
pub static FLOWS4: Array<FlowSet> =
    Array::with_max_entries(flow_table_entries(CONNTRACK_ENTRIES), BPF_F_MMAPABLE);

const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The four flow tables use the kernel's common LRU, not per-CPU LRU lists
/// (`BPF_F_NO_COMMON_LRU`): with per-CPU lists every insert rotates that CPU's lists under
/// its lock, walking up to a hundred nodes, cold in a large table: 100-200 ns more per new
/// flow, measured. The common LRU hands each CPU free nodes from a local cache refilled in
/// batches, so the shared lock is taken about once per hundred inserts.
#[map(name = "XLB_CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

/// TCP handshakes under way (client → VIP, as `XLB_CONNTRACK`): the backend a SYN went to
/// and where replies go, until the handshake's next packet creates the connection's entry.
/// A table of its own, so that a flood of SYNs evicts handshakes at most, never established
/// connections. The agent sizes it (`lb_common::handshake_entries`).
#[map(name = "XLB_HANDSHAKES")]
pub static HANDSHAKES: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(HANDSHAKE_ENTRIES_MIN, 0);

/// The reverse-NAT records of handshakes to endpoints shared by several VIPs (as
/// `XLB_REVNAT`), so that their SYN-ACKs find their VIP: a table of its own, for the same
/// reason as `XLB_HANDSHAKES`. The connection's own reverse entry comes with its next packet.
#[map(name = "XLB_HSREVNAT")]
pub static HANDSHAKE_REPLIES: LruHashMap<FlowKey, ReverseNat> =
    LruHashMap::with_max_entries(HANDSHAKE_ENTRIES_MIN, 0);

/// Backend endpoint → the VIP it serves (see `lb_common::EndpointVip`).
#[map(name = "XLB_ENDPOINTS")]
pub static ENDPOINTS: HashMap<VipKey, EndpointVip> = HashMap::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "XLB_REVNAT")]
pub static REVERSE_NAT: LruHashMap<FlowKey, ReverseNat> =
    LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

/// Interfaces that accept redirected frames; the agent leaves bridges out (they do not
/// transmit XDP frames), so a next hop behind a bridge goes through the stack instead.
#[map(name = "XLB_EGRESS")]
pub static EGRESS_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_EGRESS_PORTS, 0);

/// Port roles (`lb_common::PORT_IS_VIP`, `PORT_IS_BACKEND`), indexed by port number.
#[map(name = "XLB_PORTS")]
pub static PORTS: Array<u8> = Array::with_max_entries(PORT_ENTRIES, 0);

#[map(name = "XLB_GSTATS")]
pub static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Traffic of backends a VIP no longer has, folded in by the agent when it removes them; the
/// data path never writes here (a VIP's live traffic is its backends').
#[map(name = "XLB_VIPSTATS")]
pub static VIP_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map(name = "XLB_BESTATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

// Typed access to the entries the per-packet path changes in place. Each carries the one
// argument why a reference into the map is sound, so no raw pointer travels between
// functions.

/// A flow as its connection table keys it: IPv4 flows by their two-word key in
/// `XLB_FLOWS4`, IPv6 flows by their `FlowKey` in `XLB_CONNTRACK`.
#[derive(Clone, Copy)]
pub enum TableKey<'a> {
    V4(FlowKey4),
    V6(&'a FlowKey),
}

impl<'a> TableKey<'a> {
    /// The key of a parsed packet's flow `key` (`forward::flow_key(p)`), the IPv4 one built
    /// from the parsed fields themselves (`FlowKey4::of_packet`).
    #[inline(always)]
    pub fn of_packet(p: &Parsed, key: &'a FlowKey) -> Self {
        if p.ipv6 {
            Self::V6(key)
        } else {
            Self::V4(FlowKey4::of_packet(p))
        }
    }

    #[inline(always)]
    pub fn of(key: &'a FlowKey) -> Self {
        if is_v4_mapped(&key.dst) {
            Self::V4(FlowKey4::of(key))
        } else {
            Self::V6(key)
        }
    }
}

/// The connection-table entry of `key`: in `XLB_FLOWS4` for IPv4, `XLB_CONNTRACK` for IPv6.
#[inline(always)]
pub fn flow_entry(key: &FlowKey) -> Option<&'static mut FlowState> {
    table_entry(TableKey::of(key))
}

/// As `flow_entry`, for a key the caller has built already.
#[inline(always)]
pub fn table_entry(key: TableKey) -> Option<&'static mut FlowState> {
    match key {
        TableKey::V4(key) => flow_set(&key)?.find(&key),
        TableKey::V6(key) => {
            let entry = CONNTRACK.get_ptr_mut(key)?;
            // SAFETY: an LRU value stays allocated until the program run ends (RCU). Its
            // fields are plain words: another CPU updating the same flow at once makes the
            // last store win, which last-seen times and closing bits tolerate.
            Some(unsafe { &mut *entry })
        }
    }
}

/// Records a flow `table_entry` did not find. `Err` carries the kernel's errno (IPv6 only:
/// an IPv4 flow always finds a way).
#[inline(always)]
pub fn insert_flow(key: TableKey, state: &FlowState) -> Result<(), i32> {
    let key = match key {
        TableKey::V6(key) => return CONNTRACK.insert(key, state, 0),
        TableKey::V4(key) => key,
    };
    let Some(set) = flow_set(&key) else {
        return Ok(());
    };
    let way = set.victim();
    let (Some(slot_key), Some(slot_state)) = (set.keys.get_mut(way), set.states.get_mut(way))
    else {
        return Ok(());
    };
    // Key cleared first and written last: see `lb_common::flow_table` on concurrency.
    // SAFETY: both are references into the set, valid for the stores.
    unsafe {
        core::ptr::write_volatile(slot_key, FlowKey4::EMPTY);
        core::ptr::write_volatile(slot_state, *state);
        core::ptr::write_volatile(slot_key, key);
    }
    Ok(())
}

/// The set `key` belongs in.
#[inline(always)]
fn flow_set(key: &FlowKey4) -> Option<&'static mut FlowSet> {
    let index = key.set_index(&XLB_FLOW_MULTIPLIERS.load(), XLB_FLOW_SETS.load());
    let set = FLOWS4.get_ptr_mut(index)?;
    // SAFETY: an array value lives as long as the map. Its words are written in place by
    // every CPU; `lb_common::flow_table` says what a race between them can do.
    Some(unsafe { &mut *set })
}

/// The handshake record of `key` (see `HANDSHAKES`).
#[inline(always)]
pub fn handshake_entry(key: &FlowKey) -> Option<&'static mut FlowState> {
    let entry = HANDSHAKES.get_ptr_mut(key)?;
    // SAFETY: as in `flow_entry`.
    Some(unsafe { &mut *entry })
}

/// The reverse-NAT entry of a reply's `key` (endpoints shared by several VIPs).
#[inline(always)]
pub fn reverse_entry(key: &FlowKey) -> Option<&'static mut ReverseNat> {
    let entry = REVERSE_NAT.get_ptr_mut(key)?;
    // SAFETY: as in `flow_entry`.
    Some(unsafe { &mut *entry })
}

/// The handshake reverse-NAT record of a reply's `key` (see `HANDSHAKE_REPLIES`).
#[inline(always)]
pub fn handshake_reverse_entry(key: &FlowKey) -> Option<&'static mut ReverseNat> {
    let entry = HANDSHAKE_REPLIES.get_ptr_mut(key)?;
    // SAFETY: as in `flow_entry`.
    Some(unsafe { &mut *entry })
}

/// This CPU's cached next hop towards backend `id`.
#[inline(always)]
pub fn backend_hop_slot(id: u32) -> Option<&'static mut CachedHop> {
    let slot = BACKEND_HOPS.get_ptr_mut(id)?;
    // SAFETY: a per-CPU array slot: only this CPU writes it, with preemption disabled for
    // the whole run.
    Some(unsafe { &mut *slot })
}

/// Where a flow's next hop is cached for the rest of the run: a backend's (per CPU) for a
/// client's packet, a flow's reply hop for a backend's.
pub type HopCache = Option<&'static mut NextHop>;
