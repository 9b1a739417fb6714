//! The per-packet decision: VIP → backend (forward NAT), backend → client (reverse NAT), or
//! leave the packet alone.

use core::{ffi::c_void, mem};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns},
    maps::LruHashMap,
};
use aya_log_ebpf::warn;
use lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, Backend, CLOSE_FIN_FROM_BACKEND, CLOSE_FIN_FROM_CLIENT,
    CLOSE_RESET, CachedHop, Counter, FORWARD_NAT, FlowKey, FlowState, IPPROTO_TCP,
    LAST_SEEN_GRANULARITY_NS, NextHop, PORT_HAS_SHARED_ENDPOINT, PORT_IS_BACKEND, PORT_IS_VIP,
    ReverseNat, VipInfo, VipKey,
    addr::load_u32_words,
    flow_table::FlowKey4,
    hash::flow_hash,
    parse::{PacketBytes, Parsed, Skip, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    hook::Hook,
    icmp,
    maps::{
        BACKENDS, ENDPOINTS, HANDSHAKE_REPLIES, HANDSHAKES, HopCache, MAGLEV, PORTS, REVERSE_NAT,
        TableKey, VIPS, XLB_HASH_SEED, backend_hop_slot, flow_entry, handshake_entry,
        handshake_reverse_entry, insert_flow, reverse_entry, table_entry,
    },
    nat::Endpoint,
    stats::{count, count_forwarded},
    tunnel,
};

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// The whole per-packet path of either hook; returns the hook's verdict.
#[inline(always)]
pub fn process<H: Hook>(ctx: &H) -> u32 {
    let mut p = Parsed::EMPTY;
    if let Err(skip) = ctx.parse(&mut p) {
        if skip == Skip::Icmp
            && let Some(verdict) = icmp::translate(ctx, &mut p)
        {
            return verdict;
        }
        count(skip.counter());
        return H::PASS;
    }
    let mut t = Translation::NONE;
    let role = |port_be: u16| {
        PORTS
            .get(u32::from(u16::from_be(port_be)))
            .map_or(0, |r| *r)
    };
    // Choosing the translation and applying it are separate calls made from here, so their
    // stack frames are never stacked on each other (the verifier sums a call chain's frames).
    if role(p.dport_be) & PORT_IS_VIP != 0 {
        // The common packet, an established IPv4 flow's, is decided here without a call;
        // `to_backend` decides the rest from the start.
        let slot = match established(ctx, &p, &mut t) {
            Established::Decided(slot) => slot,
            Established::NoEntry => to_backend(ctx, &p, &mut t, false),
            Established::Undecided => to_backend(ctx, &p, &mut t, true),
        };
        if t.miss == Miss::NoBackend {
            return H::DROP;
        }
        if t.miss == Miss::None {
            if t.forwarding != FORWARD_NAT {
                return tunnel::emit(ctx, &p, &t, slot);
            }
            return ctx.emit(&p, &t, slot.map(|c| &mut c.hop));
        }
    }
    if role(p.sport_be) & PORT_IS_BACKEND != 0
        && let Some(cache) = to_client(&p, &mut t)
    {
        return ctx.emit(&p, &t, Some(cache));
    }
    count(Counter::NotForUs);
    H::PASS
}

#[inline(always)]
pub fn flow_key(p: &Parsed) -> FlowKey {
    FlowKey {
        src: p.src,
        dst: p.dst,
        sport_be: p.sport_be,
        dport_be: p.dport_be,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// The backend behind `id` if it still serves `vip_id` in the packet's family with one of
/// `required_flags` (`Backend::serves`).
#[inline(always)]
pub fn usable_backend(
    id: u32,
    vip_id: u32,
    ipv6: bool,
    required_flags: u8,
) -> Option<&'static Backend> {
    // A reference into the map, not a copy: copies of these 16-byte addresses onto the stack
    // can land 4-aligned, and LLVM then emits 8-byte stack loads the verifier refuses.
    BACKENDS
        .get(id)
        .filter(|b| b.serves(vip_id, ipv6, required_flags))
}

/// The `FlowState::closing` bits a packet adds: a RST from either side, a FIN from its
/// sender (`fin_bit`). 0 for UDP, whose flags byte is 0.
#[inline(always)]
const fn close_bits(p: &Parsed, fin_bit: u8) -> u8 {
    (if p.tcp_flags & TCP_RST != 0 {
        CLOSE_RESET
    } else {
        0
    }) | (if p.tcp_flags & TCP_FIN != 0 {
        fin_bit
    } else {
        0
    })
}

/// Adds `bits` to a flow's closing state. The entry's closing timeout counts from the
/// packet that completes the close, so `last_seen_ns` is set with it. Written only when
/// something changes: retransmitted FINs do not dirty the cache line.
#[inline(always)]
fn note_closing(state: &mut FlowState, bits: u8, now: impl FnOnce() -> u64) {
    if bits & !state.closing != 0 {
        state.closing |= bits;
        state.last_seen_ns = now();
    }
}

/// How far `established` got with a client's packet.
enum Established {
    /// The packet's flow and backend: `t` is filled, and this is the backend's hop cache.
    Decided(Option<&'static mut CachedHop>),
    /// An IPv4 packet that is neither SYN, FIN nor RST, and the connection table has no
    /// entry for its flow: `to_backend` need not look again (a handshake's ACK, an evicted
    /// flow).
    NoEntry,
    /// Anything else: `to_backend` decides it from the start.
    Undecided,
}

/// What the connection table says about a client's packet.
enum Flow {
    /// An entry that still decides the flow's backend.
    Known(u32, &'static Backend, &'static mut FlowState),
    /// A SYN: a new connection, whatever an earlier one on the same 5-tuple chose (a backend
    /// since drained, a ring since changed) is not its business. It is recorded as a
    /// handshake; the connection's entry comes with its next packet.
    Opening,
    /// No entry that holds: none (a flow's first packet, a handshake's ACK, an evicted
    /// flow), or one that is over (idle or closed past its timeout, its backend gone) or
    /// superseded by a newer handshake on its 5-tuple. The entry, if any, is taken over in
    /// place.
    Unknown(Option<&'static mut FlowState>),
}

/// Finds or picks the flow's backend and fills `t`; returns this CPU's cache of the
/// backend's hop. A flow no backend can take sets `t.miss` to `NoBackend`; a packet to no
/// VIP (a VIP port on another address) to `NotAVip`.
///
/// An established flow's packet is decided by its connection-table entry and the entry of
/// the backend it names, which repeats the VIP's key and idle timeout: no VIP lookup. Only
/// a flow without an entry that holds looks the VIP up, for its ring.
///
/// A TCP connection gets its entry from its first packet after the SYN, not from the SYN:
/// the SYN is recorded in `XLB_HANDSHAKES`, a table of its own, so a flood of SYNs evicts
/// handshakes at most, never an established connection, and costs no connection-table
/// lookup.
///
/// The cache reference travels as the return value, not inside `t`: the verifier forgets a
/// pointer's type when it is copied through memory in pieces.
///
/// `look_up` is false when `established` found no entry for the flow already.
#[inline(never)]
fn to_backend<H: Hook>(
    ctx: &H,
    p: &Parsed,
    t: &mut Translation,
    look_up: bool,
) -> Option<&'static mut CachedHop> {
    let key = flow_key(p);
    let table_key = TableKey::of_packet(p, &key);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let tcp = p.proto == IPPROTO_TCP;
    let flow = if tcp && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        Flow::Opening
    } else if !look_up {
        Flow::Unknown(None)
    } else {
        match table_entry(table_key) {
            None => Flow::Unknown(None),
            Some(state) => {
                // Established flows follow their backend while it is active or draining.
                let id = state.backend_id;
                match BACKENDS
                    .get(id)
                    .filter(|b| b.holds_flow_of(p, BACKEND_ACTIVE | BACKEND_DRAINING))
                {
                    // A connection closing, or on a draining backend, is where a client
                    // reusing its port finds an old entry: a handshake not yet consumed is a
                    // new connection, which its SYN decided.
                    Some(b)
                        if state.is_current(now, b.idle_timeout_s)
                            && !(tcp
                                && (state.closing != 0 || b.flags & BACKEND_ACTIVE == 0)
                                && handshake_entry(&key)
                                    .is_some_and(|h| h.is_recent_handshake(now))) =>
                    {
                        Flow::Known(id, b, state)
                    }
                    _ => Flow::Unknown(Some(state)),
                }
            }
        }
    };
    let closing = close_bits(p, CLOSE_FIN_FROM_CLIENT);
    let (backend_id, backend, new_flow) = match flow {
        Flow::Known(id, b, state) => return follow_known(ctx, id, b, state, closing, now, t),
        Flow::Opening => {
            // SAFETY: the agent replaces VIP entries whole and never writes into them in place.
            let Some(vip) = (unsafe { VIPS.get(&VipKey::of_packet(p)) }) else {
                return not_a_vip(t);
            };
            count(Counter::ConntrackMiss);
            let Some((id, b)) = pick_backend(&key, vip, p.ipv6) else {
                return refuse_new_flow(t);
            };
            let state = fresh_state(ctx, p, id, closing, now);
            if let Err(errno) = HANDSHAKES.insert(&key, &state, 0) {
                count(Counter::ConntrackInsertFailed);
                warn!(ctx, "handshake insert failed: errno {}", errno);
            }
            // The SYN-ACK must find its VIP already when the backend serves several: a
            // reverse record of the handshake's own, as floodable as the handshake.
            record_reverse_if_shared(ctx, &HANDSHAKE_REPLIES, p, vip, b, &state.reply_next_hop);
            (id, b, false)
        }
        Flow::Unknown(entry) => {
            // SAFETY: as above.
            let Some(vip) = (unsafe { VIPS.get(&VipKey::of_packet(p)) }) else {
                return not_a_vip(t);
            };
            count(Counter::ConntrackMiss);
            // A handshake's ACK: the connection goes where its SYN went, if that backend
            // still takes its flows (a handshake is a flow of its own: draining keeps it),
            // and the record is consumed: the connection's entry speaks for it from now on.
            // Without a record (evicted, consumed, or no SYN seen) the live ring decides.
            let recorded = if tcp {
                handshake_entry(&key)
                    .filter(|h| h.is_recent_handshake(now))
                    .and_then(|h| {
                        let id = h.backend_id;
                        let b = usable_backend(
                            id,
                            vip.vip_id,
                            p.ipv6,
                            BACKEND_ACTIVE | BACKEND_DRAINING,
                        )?;
                        h.consume();
                        Some((id, b))
                    })
            } else {
                None
            };
            let Some((id, b)) = recorded.or_else(|| pick_backend(&key, vip, p.ipv6)) else {
                return refuse_new_flow(t);
            };
            let state = fresh_state(ctx, p, id, closing, now);
            match entry {
                Some(old) => *old = state,
                None => {
                    if let Err(errno) = insert_flow(table_key, &state) {
                        // Rare by construction (LRU maps evict instead of failing).
                        count(Counter::ConntrackInsertFailed);
                        warn!(ctx, "connection-table insert failed: errno {}", errno);
                    }
                }
            }
            record_reverse_if_shared(ctx, &REVERSE_NAT, p, vip, b, &state.reply_next_hop);
            (id, b, true)
        }
    };
    forward_to(ctx, backend_id, backend, new_flow, now, t)
}

/// An IPv4 packet of an established flow (`Flow::Known`) that changes nothing but its
/// entry's last-seen time, decided as `to_backend` would. Any other packet (a SYN, FIN or
/// RST, IPv6, no entry, an entry that no longer holds, one closing or on a draining
/// backend, whose questions need the flow's full key) is left to `to_backend`.
///
/// Inlined into the entry point, so the common packet costs no BPF-to-BPF call; what it
/// keeps live is kept small, as its spills count in the entry point's frame, under every
/// call chain's.
#[inline(always)]
fn established<H: Hook>(ctx: &H, p: &Parsed, t: &mut Translation) -> Established {
    if p.ipv6 || p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return Established::Undecided;
    }
    let Some(state) = table_entry(TableKey::V4(FlowKey4::of_packet(p))) else {
        return Established::NoEntry;
    };
    let id = state.backend_id;
    let Some(b) = BACKENDS
        .get(id)
        .filter(|b| b.holds_flow_of(p, BACKEND_ACTIVE))
    else {
        return Established::Undecided;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if state.closing != 0 || !state.is_current(now, b.idle_timeout_s) {
        return Established::Undecided;
    }
    Established::Decided(follow_known(ctx, id, b, state, 0, now, t))
}

/// A packet of a flow whose entry holds (`Flow::Known`): counted, its entry kept alive and
/// `closing` bits added, `t` filled; returns the backend's hop cache.
#[inline(always)]
fn follow_known<H: Hook>(
    ctx: &H,
    id: u32,
    b: &Backend,
    state: &mut FlowState,
    closing: u8,
    now: u64,
    t: &mut Translation,
) -> Option<&'static mut CachedHop> {
    count(Counter::ConntrackHit);
    // Written at most once a second: no cache-line churn per packet.
    if now.wrapping_sub(state.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        state.last_seen_ns = now;
    }
    if closing != 0 {
        note_closing(state, closing, || now);
    }
    forward_to(ctx, id, b, false, now, t)
}

/// Counts a client's packet to backend `id`, fills `t` with the backend, and returns this
/// CPU's cache of its hop.
#[inline(always)]
fn forward_to<H: Hook>(
    ctx: &H,
    id: u32,
    b: &Backend,
    new_flow: bool,
    now: u64,
    t: &mut Translation,
) -> Option<&'static mut CachedHop> {
    count_forwarded(id, ctx.wire_len(), new_flow);
    t.endpoint = Endpoint::Destination;
    t.addr = b.addr;
    t.port_be = b.port_be;
    t.forwarding = b.forwarding;
    backend_hop(id, now)
}

/// A packet to a VIP's port but no VIP's address: not for the forward path
/// (`Miss::NotAVip`); the caller sees whether it is a reply.
#[inline(always)]
fn not_a_vip(t: &mut Translation) -> Option<&'static mut CachedHop> {
    t.miss = Miss::NotAVip;
    None
}

/// No backend can take a new flow: it is dropped (`Miss::NoBackend`).
#[inline(always)]
fn refuse_new_flow(t: &mut Translation) -> Option<&'static mut CachedHop> {
    count(Counter::NoBackend);
    t.miss = Miss::NoBackend;
    None
}

/// What a flow's first packet records (in the connection table, or for a SYN in the
/// handshake table): its backend, and the way back to the client.
#[inline(always)]
fn fresh_state<H: Hook>(ctx: &H, p: &Parsed, backend_id: u32, closing: u8, now: u64) -> FlowState {
    FlowState {
        backend_id,
        closing,
        _pad: [0; 3],
        last_seen_ns: now,
        reply_next_hop: reply_next_hop(ctx, p),
    }
}

/// Replies find their flow's own entry through the endpoint table, unless the backend
/// serves several VIPs: then they need a reverse entry of their own. The port-role array
/// says when no endpoint on the backend's port is shared, which spares the common case the
/// endpoint lookup.
#[inline(always)]
fn record_reverse_if_shared<H: Hook>(
    ctx: &H,
    table: &LruHashMap<FlowKey, ReverseNat>,
    p: &Parsed,
    vip: &VipInfo,
    b: &Backend,
    reply_hop: &NextHop,
) {
    let shared = PORTS
        .get(u32::from(u16::from_be(b.port_be)))
        .is_some_and(|r| *r & PORT_HAS_SHARED_ENDPOINT != 0)
        && {
            let endpoint = VipKey {
                addr: b.addr,
                port_be: b.port_be,
                proto: p.proto,
                _pad: [0; 5],
            };
            // SAFETY: the agent replaces endpoint entries whole.
            unsafe { ENDPOINTS.get(&endpoint) }.is_none_or(|e| e.vips != 1)
        };
    if !shared {
        return;
    }
    let reply = FlowKey::reply(b.addr, b.port_be, p.src, p.sport_be, p.proto);
    let reverse = ReverseNat {
        vip_addr: p.dst,
        vip_port_be: p.dport_be,
        _pad: 0,
        vip_id: vip.vip_id,
        next_hop: *reply_hop,
    };
    if let Err(errno) = table.insert(&reply, &reverse, 0) {
        count(Counter::ConntrackInsertFailed);
        warn!(ctx, "reverse-NAT insert failed: errno {}", errno);
    }
}

/// This CPU's cache of the backend's hop. A hop older than a second is dropped here, so
/// `next_hop` (or `tunnel::emit`) resolves it again: a changed route or neighbour reaches
/// every flow to the backend within about a second, at one FIB lookup per second per CPU
/// and backend.
#[inline(always)]
pub fn backend_hop(id: u32, now: u64) -> Option<&'static mut CachedHop> {
    let cached = backend_hop_slot(id)?;
    if now.wrapping_sub(cached.resolved_ns) > LAST_SEEN_GRANULARITY_NS {
        cached.resolved_ns = now;
        cached.hop.ifindex = 0;
    }
    Some(cached)
}

/// Replies go back the way the client's packet came: out of the interface it arrived on, to
/// the MAC it came from (the client, or the router in front of it). The LB's own neighbour
/// table may never learn that MAC, since XDP answered in its place, so a lookup could fail
/// where this cannot. VLAN-tagged flows keep an empty entry: the stack handles those.
#[inline(always)]
fn reply_next_hop<H: Hook>(ctx: &H, p: &Parsed) -> NextHop {
    match ctx.packet().read::<12>(0) {
        Some(eth) if p.l3_offset == lb_common::parse::ETH_HLEN && !ctx.vlan_tagged() => NextHop {
            ifindex: ctx.ingress_ifindex(),
            src_mac: [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]],
            dst_mac: [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]],
        },
        _ => NextHop::default(),
    }
}

/// Picks a backend for a new flow from the VIP's live Maglev ring.
#[inline(always)]
fn pick_backend(key: &FlowKey, vip: &VipInfo, ipv6: bool) -> Option<(u32, &'static Backend)> {
    let slot = vip.ring_slot(flow_hash(key, XLB_HASH_SEED.load()))?;
    let id = *MAGLEV.get(slot)?;
    usable_backend(id, vip.vip_id, ipv6, BACKEND_ACTIVE).map(|b| (id, b))
}

/// A reply from a backend: its source becomes the VIP again. Returns where the flow keeps
/// the reply's next hop, or `None` when the packet belongs to no flow xlb knows.
#[inline(never)]
fn to_client(p: &Parsed, t: &mut Translation) -> HopCache {
    let reply = Reply {
        src: &p.src,
        dst: &p.dst,
        sport_be: p.sport_be,
        dport_be: p.dport_be,
        proto: p.proto,
    };
    let cache = reply_flow(&reply, t);
    cache.as_ref()?;
    count(Counter::ReverseNat);
    t.endpoint = Endpoint::Source;
    let closing = close_bits(p, CLOSE_FIN_FROM_BACKEND);
    if closing != 0 {
        // Only FINs and RSTs pay for finding the flow's own entry again: `reply_flow` only
        // looks, as ICMP errors use it too.
        note_reply_closing(p, &t.addr, t.port_be, closing);
    }
    cache
}

/// A reply's 5-tuple as it leaves the backend (backend → client), by reference: a
/// `FlowKey` is only built where a lookup needs one.
pub struct Reply<'a> {
    pub src: &'a [u8; 16],
    pub dst: &'a [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
}

/// The flow `reply` belongs to: puts the VIP it must come from into `t.addr`/`t.port_be`
/// and returns where the flow keeps the reply's next hop; `None` when xlb knows no such
/// flow. Only looks: ICMP errors quoting a packet of the flow find it this way too.
#[inline(always)]
pub fn reply_flow(reply: &Reply, t: &mut Translation) -> HopCache {
    let endpoint = VipKey {
        addr: *reply.src,
        port_be: reply.sport_be,
        proto: reply.proto,
        _pad: [0; 5],
    };
    // SAFETY: the agent replaces endpoint entries whole.
    let e = (unsafe { ENDPOINTS.get(&endpoint) })?;
    // A backend serving several VIPs: the reply's own reverse entry says which VIP (a
    // handshake's, until the connection's next packet records the connection's).
    let reverse = if e.vips != 1 {
        let key = FlowKey {
            src: *reply.src,
            dst: *reply.dst,
            sport_be: reply.sport_be,
            dport_be: reply.dport_be,
            proto: reply.proto,
            _pad: [0; 3],
        };
        reverse_entry(&key).or_else(|| handshake_reverse_entry(&key))
    } else {
        None
    };
    let (vip_addr, vip_port_be) = match &reverse {
        Some(r) => (r.vip_addr, r.vip_port_be),
        None => (e.vip_addr, e.vip_port_be),
    };
    // Either way the flow's own entry, client → VIP, must still name this backend: the
    // client may have other flows to the VIP on other backends, and a backend that left the
    // VIP no longer speaks for it.
    let key = FlowKey {
        src: *reply.dst,
        dst: vip_addr,
        sport_be: reply.dport_be,
        dport_be: vip_port_be,
        proto: reply.proto,
        _pad: [0; 3],
    };
    let cache = match flow_entry(&key) {
        Some(state) if is_backend(state.backend_id, reply) => match reverse {
            Some(r) => &mut r.next_hop,
            None => &mut state.reply_next_hop,
        },
        // A TCP handshake has no entry until the client's next packet (or an old
        // connection's entry, on a reused port): the backend's answer to its SYN (SYN-ACK,
        // or a reset) finds the handshake's record instead.
        _ if reply.proto == IPPROTO_TCP => {
            let h = handshake_entry(&key)?;
            if !is_backend(h.backend_id, reply) {
                return None;
            }
            match reverse {
                Some(r) => &mut r.next_hop,
                None => &mut h.reply_next_hop,
            }
        }
        _ => return None,
    };
    t.addr = vip_addr;
    t.port_be = vip_port_be;
    Some(cache)
}

/// Whether backend `id` is the one `reply` comes from.
#[inline(always)]
fn is_backend(id: u32, reply: &Reply) -> bool {
    BACKENDS
        .get(id)
        .is_some_and(|b| b.addr == *reply.src && b.port_be == reply.sport_be)
}

/// A backend's FIN or RST on a flow whose reply came through a reverse-NAT entry: recorded
/// in the flow's own entry (client → VIP), which decides its lifetime.
#[inline(always)]
fn note_reply_closing(p: &Parsed, vip_addr: &[u8; 16], vip_port_be: u16, bits: u8) {
    let key = FlowKey {
        src: p.dst,
        dst: *vip_addr,
        sport_be: p.dport_be,
        dport_be: vip_port_be,
        proto: p.proto,
        _pad: [0; 3],
    };
    if let Some(state) = flow_entry(&key) {
        // SAFETY: a helper without arguments.
        note_closing(state, bits, || unsafe { bpf_ktime_get_coarse_ns() });
    }
}

/// How a packet is to be rewritten (8-aligned, address first: see `lb_common::abi`).
#[repr(C, align(8))]
pub struct Translation {
    pub addr: [u8; 16],
    pub port_be: u16,
    /// The flow's backend, where an ICMP error about a tunnelled flow needs its hop (ids
    /// fit: `MAX_BACKENDS` is below 2^16). Small fields, widest first, keep the struct at
    /// 24 bytes: it lives in the entry point's frame, which the TC call chain cannot spare.
    pub backend_id: u16,
    pub endpoint: Endpoint,
    pub miss: Miss,
    /// The packet is translated already (an ICMP error, see `icmp.rs`): handing it on only
    /// lowers its TTL. `addr` is then its destination, for the next-hop lookup.
    pub already_translated: bool,
    /// The backend's `Backend::forwarding`: NAT, or the tunnel to send the packet through.
    pub forwarding: u8,
}

const _: () = assert!(
    core::mem::size_of::<Translation>() == 24 && core::mem::offset_of!(Translation, addr) == 0
);
const _: () = assert!(lb_common::MAX_BACKENDS <= 1 << 16);

/// Why the forward path does not take a packet to a VIP's port.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Miss {
    /// It does: the backend is in the translation.
    None,
    /// No backend can take this new flow: drop it.
    NoBackend,
    /// The packet went to a VIP's port on an address that is no VIP.
    NotAVip,
}

impl Translation {
    /// `addr` as native words, for the rewrite (`lb_common::addr::load_u32_words`).
    #[inline(always)]
    pub fn addr_words(&self) -> [u32; 4] {
        // SAFETY: `Translation` is 8-aligned with `addr` at offset 0 (asserted below).
        unsafe { load_u32_words(&self.addr) }
    }

    pub const NONE: Self = Self {
        addr: [0; 16],
        port_be: 0,
        backend_id: 0,
        endpoint: Endpoint::Destination,
        miss: Miss::None,
        already_translated: false,
        forwarding: FORWARD_NAT,
    };
}

/// Where a packet leaves: the egress interface and the Ethernet header's MACs, as the
/// words `Packet::write_mac_words` stores. Taken from the cache as words at once: a copy of a
/// `NextHop` would carry its twelve MAC bytes one by one to where the frame is written.
#[derive(Clone, Copy)]
pub struct Egress {
    pub ifindex: u32,
    pub macs: [u32; 3],
}

impl Egress {
    #[inline(always)]
    fn of(hop: &NextHop) -> Self {
        Self {
            ifindex: hop.ifindex,
            macs: hop.mac_words(),
        }
    }
}

/// The layer-2 next hop towards `dst`, from the cache (the backend's, for a client's packet;
/// the flow's, for a reply) or `bpf_fib_lookup` (which then fills the cache). `None`: let the
/// stack forward it.
#[inline(always)]
pub fn next_hop<H: Hook>(ctx: &H, p: &Parsed, t: &Translation, cache: HopCache) -> Option<Egress> {
    if let Some(c) = &cache
        && c.ifindex != 0
    {
        return Some(Egress::of(c));
    }
    // The rewritten packet's addresses: that is what is routed.
    let (src, sport_be, dst, dport_be) = match t.endpoint {
        Endpoint::Destination => (&p.src, p.sport_be, &t.addr, t.port_be),
        Endpoint::Source => (&t.addr, t.port_be, &p.dst, p.dport_be),
    };
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented "no input" state.
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
    params.family = if p.ipv6 { AF_INET6 } else { AF_INET };
    params.l4_protocol = p.proto;
    params.sport = sport_be;
    params.dport = dport_be;
    params.__bindgen_anon_1.tot_len = ctx.fib_tot_len(p);
    params.ifindex = ctx.ingress_ifindex();
    if p.ipv6 {
        params.__bindgen_anon_3.ipv6_src = words(src);
        params.__bindgen_anon_4.ipv6_dst = words(dst);
    } else {
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[12], src[13], src[14], src[15]]);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[12], dst[13], dst[14], dst[15]]);
    }
    // SAFETY: params is a properly sized, initialised struct on our stack.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr().cast::<c_void>(),
            &raw mut params,
            mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        // Nothing is cached: the stack resolves a missing neighbour, and a missing route is
        // a fault the operator fixes; every packet until then retries, and is counted.
        count(Counter::NextHopFailure);
        return None;
    }
    // Whether the hook can send out of `egress` is the hook's business when it emits (an XDP
    // redirect into an interface outside the redirect map fails, and the packet goes to the
    // stack); the cache is shared by both hooks.
    let egress = params.ifindex;
    // SAFETY: on success the kernel filled the smac/dmac arm of the union.
    let macs = unsafe { params.__bindgen_anon_6.__bindgen_anon_2 };
    let nh = NextHop {
        ifindex: egress,
        src_mac: macs.smac,
        dst_mac: macs.dmac,
    };
    if let Some(c) = cache {
        *c = nh;
    }
    Some(Egress::of(&nh))
}

#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
