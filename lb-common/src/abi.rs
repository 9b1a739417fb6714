//! Map names, sizes and `#[repr(C)]` layouts shared by the XDP program and the agent.
//!
//! Rules for every type here: explicit padding fields (no implicit holes, so the kernel's
//! byte-wise key hashing sees no garbage), integers in the byte order noted in the field name
//! (`_be` = network order, as read from the packet), and `u32`/`u8` flags instead of `bool`.

use crate::parse::Parsed;

/// Map names as they appear in the object file and on bpffs (at most 15 bytes each).
pub mod map_names {
    pub const VIPS: &str = "XLB_VIPS";
    pub const MAGLEV: &str = "XLB_MAGLEV";
    pub const BACKENDS: &str = "XLB_BACKENDS";
    /// IPv6 flows (a kernel LRU hash map); IPv4 flows are in `FLOWS4`.
    pub const CONNTRACK: &str = "XLB_CONNTRACK";
    /// IPv4 flows: a set-associative array (`crate::flow_table`).
    pub const FLOWS4: &str = "XLB_FLOWS4";
    pub const REVERSE_NAT: &str = "XLB_REVNAT";
    pub const EGRESS_PORTS: &str = "XLB_EGRESS";
    pub const GLOBAL_STATS: &str = "XLB_GSTATS";
    pub const VIP_STATS: &str = "XLB_VIPSTATS";
    pub const BACKEND_STATS: &str = "XLB_BESTATS";
    pub const PORTS: &str = "XLB_PORTS";
    pub const ENDPOINTS: &str = "XLB_ENDPOINTS";
    pub const BACKEND_HOPS: &str = "XLB_BEHOPS";
    pub const HANDSHAKES: &str = "XLB_HANDSHAKES";
    pub const HANDSHAKE_REPLIES: &str = "XLB_HSREVNAT";
    pub const ENCAP: &str = "XLB_ENCAP";
    /// All maps the agent pins, in a stable order.
    pub const ALL: [&str; 16] = [
        VIPS,
        MAGLEV,
        BACKENDS,
        CONNTRACK,
        FLOWS4,
        REVERSE_NAT,
        EGRESS_PORTS,
        GLOBAL_STATS,
        VIP_STATS,
        BACKEND_STATS,
        PORTS,
        ENDPOINTS,
        BACKEND_HOPS,
        HANDSHAKES,
        HANDSHAKE_REPLIES,
        ENCAP,
    ];
}

/// `XLB_PORTS` (an array indexed by port number, host order): which roles a port plays. A
/// packet is looked up in the VIP table only if its destination port is some VIP's, and in
/// the reverse-NAT table only if its source port is some backend's: traffic that is not the
/// balancer's costs one array read instead of two hash lookups.
pub const PORT_IS_VIP: u8 = 1;
pub const PORT_IS_BACKEND: u8 = 2;
/// Some backend endpoint on this port serves several VIPs: a new flow to a backend on this
/// port looks its endpoint up, to learn whether its replies need a reverse-NAT entry. Set
/// before such an endpoint's entry says so, cleared after: the common case (no endpoint on
/// the port is shared) costs a new flow no endpoint lookup.
pub const PORT_HAS_SHARED_ENDPOINT: u8 = 4;
pub const PORT_ENTRIES: u32 = 65_536;

/// Program names in the object file.
pub mod program_names {
    /// The load balancer itself, at XDP.
    pub const XLB: &str = "xlb";
    /// The same load balancer at TC ingress (tcx), for veths and bridges.
    pub const XLB_TC: &str = "xlb_tc";
    /// Benchmark floor: returns `XDP_PASS` and nothing else.
    pub const FLOOR_PASS: &str = "xlb_floor_pass";
    /// Benchmark floor: parses Ethernet/IP/L4 like xlb does, then passes.
    pub const FLOOR_PARSE: &str = "xlb_floor_parse";
    /// Forwarding benchmark: in-kernel traffic generator for `BPF_F_TEST_XDP_LIVE_FRAMES`.
    pub const BENCH_GENERATE: &str = "xlb_bench_gen";
    /// Forwarding benchmark: the ceiling of the path (rewrite MACs, redirect, nothing else).
    pub const BENCH_REDIRECT: &str = "xlb_bench_redirect";
    /// Forwarding benchmark: counts and drops whatever reaches a backend.
    pub const BENCH_SINK: &str = "xlb_bench_sink";
}

/// Maps used only by the benchmark programs.
pub mod bench_maps {
    /// `Array<BenchFrame>`, index 0: the generator's frame template and flow count.
    pub const FRAME: &str = "XLB_BENCH_FRAME";
    /// `Array<NextHop>`, `BENCH_SPREAD_SLOTS` entries: where the redirect ceiling sends a
    /// frame, by its source port (`BENCH_SPORT_OFFSET`).
    pub const REDIRECT_TO: &str = "XLB_BENCH_NH";
    /// `PerCpuArray<u64>`, index 0: packets counted by the sink (and by the generator).
    pub const COUNT: &str = "XLB_BENCH_CNT";
    /// `DevMapHash`: the interfaces the redirect ceiling may send to.
    pub const PORTS: &str = "XLB_BENCH_PORTS";
}

/// Size of every frame the benchmark generator writes (minimum Ethernet frame, no FCS): a
/// fixed size keeps the template copy a constant-length, verifier-friendly write.
pub const BENCH_FRAME_LEN: usize = 64;

/// Offset of the generated frame's UDP source port (Ethernet 14 + IPv4 20), the field the
/// generator varies to make flows.
pub const BENCH_SPORT_OFFSET: usize = 34;

/// Slots of the redirect ceiling's next-hop array. A frame goes to slot `(low byte of its
/// source port) % BENCH_SPREAD_SLOTS`: filled with one next hop, the ceiling sends everything
/// to one backend; filled with backend `i % n` in slot `i`, it spreads the generator's flows
/// over `n` backends as a balancer does, at the same cost per packet.
pub const BENCH_SPREAD_SLOTS: u32 = 8;

/// The benchmark generator's template: every generated frame is `bytes` with the 16-bit
/// (network order) source port at `sport_offset` replaced by `sport_base + (n mod flows)`.
/// The template's L4 checksum must be 0 (UDP over IPv4), so varying the port keeps it valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    pub bytes: [u8; BENCH_FRAME_LEN],
    pub flows: u32,
    pub sport_offset: u32,
    pub sport_base: u32,
    pub _pad: u32,
}

/// Name of the global read-only variable holding the flow-hash seed. Every node of a cluster
/// must use the same seed so that they all pick the same backend for the same flow.
pub const HASH_SEED_SYMBOL: &str = "XLB_HASH_SEED";
/// The seed used when the operator does not choose one.
pub const DEFAULT_HASH_SEED: u32 = 0x786c_6221; // "xlb!"

/// Maglev ring size per VIP unless configured otherwise (prime, as in Katran).
pub const DEFAULT_RING_SIZE: u32 = 65_537;
/// VIP slots; each owns two rings (double buffer) in the Maglev array.
pub const DEFAULT_MAX_VIPS: u32 = 64;
/// Backend slots across all VIPs (ids are per VIP/backend pair).
pub const MAX_BACKENDS: u32 = 16_384;
/// Connection-table entries, shared by all VIPs: the ways of `XLB_FLOWS4` (IPv4) and the
/// entries of `XLB_CONNTRACK` (IPv6) each.
pub const CONNTRACK_ENTRIES: u32 = 1 << 20;
/// Connection-table entries per `XLB_HANDSHAKES` entry. A record is needed for one round trip
/// (SYN to the handshake's ACK), but under a flood it must outlast that many spoofed SYNs:
/// half the connection table keeps a record for a quarter of a second at a million SYNs a
/// second per CPU (with the default size), at half the connection table's memory.
pub const HANDSHAKE_ENTRIES_DIVISOR: u32 = 2;
/// The smallest handshake table, whatever the connection table's size.
pub const HANDSHAKE_ENTRIES_MIN: u32 = 8192;

/// `XLB_HANDSHAKES` entries for a connection table of `conntrack_entries`.
#[must_use]
pub const fn handshake_entries(conntrack_entries: u32) -> u32 {
    let n = conntrack_entries / HANDSHAKE_ENTRIES_DIVISOR;
    if n < HANDSHAKE_ENTRIES_MIN {
        HANDSHAKE_ENTRIES_MIN
    } else {
        n
    }
}
/// Egress interfaces the program may redirect to.
pub const MAX_EGRESS_PORTS: u32 = 256;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Key of `XLB_VIPS`: a service address. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so one map serves both families.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

impl VipKey {
    /// The VIP a parsed packet is addressed to: its destination, port and protocol.
    #[inline(always)]
    #[must_use]
    pub fn of_packet(p: &Parsed) -> Self {
        Self {
            addr: p.dst,
            port_be: p.dport_be,
            proto: p.proto,
            _pad: [0; 5],
        }
    }

    /// Whether `p` is addressed to this VIP (`*self == VipKey::of_packet(p)`), in three
    /// 8-byte compares (the key is 8-aligned and its padding zero), where a derived `==`
    /// may compare the address byte by byte in eBPF, and without building the key: the
    /// packet's side comes from the parsed fields as they were stored (a key built with
    /// byte and half-word stores and read back as words would make each wide load wait for
    /// the stores under it to drain).
    #[inline(always)]
    #[must_use]
    pub fn is_destination_of(&self, p: &Parsed) -> bool {
        let [a0, a1] = p.dst_u64_words();
        let port = p.dport_be.to_ne_bytes();
        let tail = u64::from_ne_bytes([port[0], port[1], p.proto, 0, 0, 0, 0, 0]);
        self.words() == [a0, a1, tail]
    }

    /// The key as three native words, read with three 8-byte loads.
    #[inline(always)]
    fn words(&self) -> [u64; 3] {
        // SAFETY: `VipKey` is 24 bytes, 8-aligned, without implicit padding (asserted
        // below): it reads as three initialised `u64`s.
        unsafe { core::ptr::read(core::ptr::from_ref(self).cast::<[u64; 3]>()) }
    }
}

const _: () = assert!(
    core::mem::size_of::<VipKey>() == 24
        && core::mem::align_of::<VipKey>() == 8
        && core::mem::offset_of!(VipKey, port_be) == 16
        && core::mem::offset_of!(VipKey, proto) == 18
        && core::mem::offset_of!(VipKey, _pad) == 19
);

/// Value of `XLB_VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into the per-VIP stats array; also checked against `Backend::vip_id`.
    pub vip_id: u32,
    /// First slot of the VIP's live ring in `XLB_MAGLEV`. The agent writes a new ring into the
    /// other half of the VIP's double buffer and then replaces this value in one map update,
    /// so a packet sees either the old ring or the new one, never a mix.
    pub ring_base: u32,
    /// Slots in the live ring; 0 when the VIP has no usable backend.
    pub ring_size: u32,
    /// How long the VIP's flows may go without a packet before their connection-table entry
    /// stops counting (the next packet gets a fresh choice), in seconds. 0: never, as in maps
    /// written before timeouts existed, until the agent rewrites the entry.
    pub idle_timeout_s: u32,
}

impl VipInfo {
    /// The `XLB_MAGLEV` index a new flow with `hash` takes in the live ring; `None` when the
    /// VIP has no usable backend.
    #[inline(always)]
    #[must_use]
    pub const fn ring_slot(&self, hash: u32) -> Option<u32> {
        if self.ring_size == 0 {
            return None;
        }
        Some(self.ring_base + crate::hash::ring_offset(hash, self.ring_size))
    }
}

/// How long a handshake's record (`XLB_HANDSHAKES`) says where its SYN went: longer than a
/// handshake takes, SYN-ACK retransmissions included.
pub const HANDSHAKE_TIMEOUT_S: u32 = 30;

/// Idle timeout of a TCP VIP's established connections unless configured otherwise.
pub const DEFAULT_TCP_IDLE_TIMEOUT_S: u32 = 300;
/// Idle timeout of a UDP VIP's flows unless configured otherwise.
pub const DEFAULT_UDP_IDLE_TIMEOUT_S: u32 = 60;
/// Longest idle timeout accepted (a week).
pub const MAX_IDLE_TIMEOUT_S: u32 = 7 * 24 * 3600;
/// How long a closing connection's entry lives after its last packet: long enough for the
/// final ACKs and retransmitted FINs, short enough that it neither lingers in `live_flows`
/// nor outlives the client's TIME_WAIT by much. A TCP idle timeout is never shorter.
pub const CLOSING_TIMEOUT_S: u32 = 10;

const NS_PER_S: u64 = 1_000_000_000;

/// `Backend::flags`: the backend takes new flows (it is in the Maglev ring).
pub const BACKEND_ACTIVE: u8 = 1;
/// `Backend::flags`: established flows continue, no new ones (not in the ring).
pub const BACKEND_DRAINING: u8 = 2;

/// Value of `XLB_BACKENDS`, indexed by backend id.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    pub port_be: u16,
    /// 4 or 6.
    pub family: u8,
    /// `BACKEND_ACTIVE` | `BACKEND_DRAINING`; 0 = slot unused.
    pub flags: u8,
    /// The VIP this backend serves; a connection-table entry whose VIP differs from it is
    /// stale (the id was reused) and is treated as a miss.
    pub vip_id: u32,
    /// That VIP's key, as packets to it carry it, and its idle timeout
    /// (`VipInfo::idle_timeout_s`): a packet of an established flow is checked against its
    /// backend's entry alone, with no VIP lookup.
    pub vip: VipKey,
    pub idle_timeout_s: u32,
    /// How packets reach this backend: `FORWARD_NAT`, `FORWARD_IPIP` or `FORWARD_GUE`,
    /// repeated from its VIP like the idle timeout.
    pub forwarding: u8,
    pub _pad: [u8; 3],
}

/// `Backend::forwarding`: the destination becomes the backend's address and port; replies
/// come back through the balancer, which restores the VIP as their source.
pub const FORWARD_NAT: u8 = 0;
/// `Backend::forwarding`, direct server return: the client's packet, untouched, inside an IP
/// header to the backend (IPv4 in IPv4, IPv6 in IPv6). The backend answers from the VIP
/// straight to the client.
pub const FORWARD_IPIP: u8 = 1;
/// `Backend::forwarding`, direct server return: the client's packet inside IP and UDP (GUE
/// variant 1, "direct IP": no GUE header, the inner IP version says what follows), the UDP
/// source port carrying the flow's entropy for the backend NIC's receive-side scaling.
pub const FORWARD_GUE: u8 = 2;

/// Default UDP destination port of GUE-encapsulated packets (Katran's).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// Outer IPv4 header (IPIP), and with the UDP header (GUE).
pub const IPIP_V4_OVERHEAD: u16 = 20;
pub const GUE_V4_OVERHEAD: u16 = 28;
/// Outer IPv6 header (IPv6 in IPv6), and with the UDP header (GUE).
pub const IPIP_V6_OVERHEAD: u16 = 40;
pub const GUE_V6_OVERHEAD: u16 = 48;

/// The backend-side program (`xlb-decap` object, `xlb_decap` TC program): the global
/// holding the GUE port it accepts (network order), and its per-CPU counters, in
/// `DECAP_COUNTERS` order.
pub mod decap {
    pub const OBJECT_PROGRAM: &str = "xlb_decap";
    pub const GUE_PORT_SYMBOL: &str = "XLB_DECAP_GUE_PORT";
    pub const COUNTERS_MAP: &str = "XLB_DECAP_CNT";
    /// Tunnelled packets whose outer headers were taken off.
    pub const DECAPSULATED: u32 = 0;
    /// Tunnelled packets the kernel refused to shrink (`bpf_skb_adjust_room`): passed as
    /// they came, so the stack drops them where nothing decapsulates.
    pub const FAILED: u32 = 1;
    pub const COUNTERS: [&str; 2] = ["decapsulated", "decap_failed"];
}

/// Value of `XLB_ENCAP` (one entry): the node's settings for direct server return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncapSettings {
    /// The outer source address of IPv4 tunnels; all zero: the source address of the
    /// kernel's route to the backend (the balancer's own address towards it).
    pub src_v4: [u8; 4],
    /// UDP destination port of GUE packets; 0 means `DEFAULT_GUE_PORT`.
    pub gue_port_be: u16,
    pub _pad: u16,
    /// As `src_v4`, for IPv6 tunnels.
    pub src_v6: [u8; 16],
}

impl Backend {
    #[must_use]
    pub const fn carries_flows(&self) -> bool {
        self.flags & (BACKEND_ACTIVE | BACKEND_DRAINING) != 0
    }

    /// Whether this entry may take a packet of `vip_id`'s flow: one of `required` flags set
    /// (`BACKEND_ACTIVE` for a new flow; `| BACKEND_DRAINING` for an established one), and
    /// the same VIP and family. Ids are reused after removal, so a connection-table entry
    /// can name an id that now belongs to another VIP or address family: that entry is stale.
    #[inline(always)]
    #[must_use]
    pub const fn serves(&self, vip_id: u32, ipv6: bool, required: u8) -> bool {
        let family = if ipv6 { 6 } else { 4 };
        self.flags & required != 0 && self.vip_id == vip_id && self.family == family
    }

    /// Whether a connection-table entry naming this backend still holds for the packet `p`:
    /// the backend serves the very VIP `p` is addressed to (an id reused by another VIP, or
    /// a VIP removed and its address reused, do not), with one of `required` flags set. The
    /// family comes with the VIP's address.
    #[inline(always)]
    #[must_use]
    pub fn holds_flow_of(&self, p: &Parsed, required: u8) -> bool {
        self.flags & required != 0 && self.vip.is_destination_of(p)
    }
}

/// Key of `XLB_CONNTRACK` (client → VIP, as the packet arrived) and of `XLB_REVNAT`
/// (backend → client, as the reply arrives).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The `XLB_REVNAT` key of replies to a flow from `client`:`client_port_be` that went to
    /// `backend`:`backend_port_be`: the reply as it leaves the backend.
    #[inline(always)]
    #[must_use]
    pub const fn reply(
        backend: [u8; 16],
        backend_port_be: u16,
        client: [u8; 16],
        client_port_be: u16,
        proto: u8,
    ) -> Self {
        Self {
            src: backend,
            dst: client,
            sport_be: backend_port_be,
            dport_be: client_port_be,
            proto,
            _pad: [0; 3],
        }
    }
}

/// A resolved layer-2 next hop, cached in connection-table entries so that only the first
/// packet of a flow pays for `bpf_fib_lookup`. `ifindex == 0` means not resolved yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

impl NextHop {
    /// The first 12 bytes of an Ethernet header towards this next hop (destination, then
    /// source) as three native words, for three 4-byte stores into a frame. Read as the
    /// struct's three 4-byte words after `ifindex` and shuffled in registers: reading the
    /// MAC arrays compiles to twelve byte loads in eBPF.
    #[inline(always)]
    #[must_use]
    pub fn mac_words(&self) -> [u32; 3] {
        // SAFETY: `NextHop` is 16 bytes without padding, 4-aligned (its `u32` comes first),
        // so it reads as four initialised `u32`s; any bits are a valid `[u32; 4]`.
        let [_, m1, m2, m3] =
            unsafe { core::ptr::read(core::ptr::from_ref(self).cast::<[u32; 4]>()) };
        // Memory order: ifindex, src_mac (bytes 4..10), dst_mac (bytes 10..16).
        let (s, sd, d) = (m1.to_ne_bytes(), m2.to_ne_bytes(), m3.to_ne_bytes());
        [
            u32::from_ne_bytes([sd[2], sd[3], d[0], d[1]]),
            u32::from_ne_bytes([d[2], d[3], s[0], s[1]]),
            u32::from_ne_bytes([s[2], s[3], sd[0], sd[1]]),
        ]
    }
}

const _: () = assert!(
    core::mem::size_of::<NextHop>() == 16
        && core::mem::align_of::<NextHop>() == 4
        && core::mem::offset_of!(NextHop, src_mac) == 4
        && core::mem::offset_of!(NextHop, dst_mac) == 10
);

/// `FlowState::closing`: the client sent a FIN.
pub const CLOSE_FIN_FROM_CLIENT: u8 = 1;
/// `FlowState::closing`: the backend sent a FIN.
pub const CLOSE_FIN_FROM_BACKEND: u8 = 2;
/// `FlowState::closing`: either side sent a RST.
pub const CLOSE_RESET: u8 = 4;

/// A flow's connection-table entry: the value of `XLB_CONNTRACK` (IPv6), and each way's
/// state in `XLB_FLOWS4` (IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub backend_id: u32,
    /// `CLOSE_*` bits: how far a TCP connection has got towards its end (0 for UDP).
    pub closing: u8,
    pub _pad: [u8; 3],
    /// `CLOCK_MONOTONIC` (coarse) time of the flow's last packet, refreshed at most once a
    /// second (and when the flow starts closing): its age decides whether the entry still
    /// holds.
    pub last_seen_ns: u64,
    /// Where replies go: back out of the interface the client's packet came in on, to the
    /// MAC it came from.
    pub reply_next_hop: NextHop,
}

impl FlowState {
    /// A reset, or a FIN from each side: only stragglers of this connection are still to
    /// come. One FIN alone is a half-close, after which the other side may go on sending.
    #[inline(always)]
    #[must_use]
    pub const fn is_closing(&self) -> bool {
        self.closing & CLOSE_RESET != 0
            || self.closing & (CLOSE_FIN_FROM_CLIENT | CLOSE_FIN_FROM_BACKEND)
                == CLOSE_FIN_FROM_CLIENT | CLOSE_FIN_FROM_BACKEND
    }

    /// Whether the entry still decides where the flow's packets go at `now_ns`: it has seen
    /// a packet within its VIP's idle timeout (`idle_timeout_s`, 0 = none), or within
    /// `CLOSING_TIMEOUT_S` once closing. `last_seen_ns` lags by up to a second, so timeouts
    /// are that accurate. An entry written on another CPU a moment ago may be a tick ahead
    /// of `now_ns`: that is age 0, not a wrapped-around age.
    #[inline(always)]
    #[must_use]
    pub const fn is_current(&self, now_ns: u64, idle_timeout_s: u32) -> bool {
        let age = now_ns.saturating_sub(self.last_seen_ns);
        if self.is_closing() {
            age <= CLOSING_TIMEOUT_S as u64 * NS_PER_S
        } else {
            idle_timeout_s == 0 || age <= idle_timeout_s as u64 * NS_PER_S
        }
    }

    /// Whether an `XLB_HANDSHAKES` record still says where its handshake's SYN went at
    /// `now_ns`: not consumed, and no older than a handshake can take
    /// (`HANDSHAKE_TIMEOUT_S`).
    #[inline(always)]
    #[must_use]
    pub const fn is_recent_handshake(&self, now_ns: u64) -> bool {
        self.last_seen_ns != 0
            && now_ns.saturating_sub(self.last_seen_ns) <= HANDSHAKE_TIMEOUT_S as u64 * NS_PER_S
    }

    /// Marks an `XLB_HANDSHAKES` record as used by the connection it created, whose entry
    /// decides from then on: a record left standing would pass for a client reusing the
    /// port.
    #[inline(always)]
    pub const fn consume(&mut self) {
        self.last_seen_ns = 0;
    }

    /// A flow that is really live: current and not closing (what `live_flows` counts).
    #[inline(always)]
    #[must_use]
    pub const fn is_live(&self, now_ns: u64, idle_timeout_s: u32) -> bool {
        !self.is_closing() && self.is_current(now_ns, idle_timeout_s)
    }
}

/// Value of `XLB_ENDPOINTS`, keyed by a backend's address, port and protocol (a `VipKey`
/// layout). A reply from an endpoint that serves one VIP finds its flow's own entry (client →
/// that VIP) in the connection table, so a new flow needs no reverse-NAT entry: one table
/// insert per flow instead of two. Endpoints shared by several VIPs keep per-flow
/// reverse-NAT entries; `vip` then stays the VIP it served first, whose flows may predate
/// the sharing and have no reverse entry.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointVip {
    pub vip_addr: [u8; 16],
    pub vip_port_be: u16,
    pub _pad: u16,
    /// How many VIPs this endpoint is a backend of.
    pub vips: u32,
}

/// How stale `FlowState::last_seen_ns` may get before it is rewritten, and how long a CPU
/// keeps a backend's resolved next hop (`CachedHop`) before resolving it again.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Value of `XLB_BEHOPS` (per CPU, indexed by backend id): the layer-2 next hop towards a
/// backend as this CPU last resolved it with `bpf_fib_lookup`. Per backend, not per flow, so
/// a new flow costs no FIB lookup and a flow entry carries no forward next hop; per CPU, so
/// it is written without contention and never read half-written. The agent zeroes a
/// backend's slots when its id is (re)assigned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedHop {
    pub hop: NextHop,
    /// When `hop` was last (re)validated; it is dropped a second later, so a changed route
    /// or neighbour reaches every flow within about a second.
    pub resolved_ns: u64,
    /// For tunnelled backends (`FORWARD_IPIP`, `FORWARD_GUE`): the outer source address
    /// (IPv4 in the last 4 bytes, as elsewhere), resolved with the hop.
    pub encap_src: [u8; 16],
    /// The MTU of the route to the backend, resolved with the hop: a client's packet that
    /// no longer fits once encapsulated is answered with an ICMP "too big". 0: unknown.
    pub mtu: u16,
    /// The GUE destination port (network order), from `XLB_ENCAP`, resolved with the hop.
    pub gue_port_be: u16,
    pub _pad: [u8; 4],
}

/// Value of `XLB_REVNAT`: what a reply's source must be rewritten to.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseNat {
    pub vip_addr: [u8; 16],
    pub vip_port_be: u16,
    pub _pad: u16,
    pub vip_id: u32,
    pub next_hop: NextHop,
}

/// Per-VIP and per-backend counters (`XLB_VIPSTATS`, `XLB_BESTATS`, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl TrafficCounters {
    #[must_use]
    pub const fn merged(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            new_flows: self.new_flows + other.new_flows,
        }
    }
}

/// Indices of `XLB_GSTATS` (per-CPU `u64` array).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    ActionAborted = 0,
    ActionDrop = 1,
    ActionPass = 2,
    ActionTx = 3,
    ActionRedirect = 4,
    /// Truncated or inconsistent headers.
    Malformed = 5,
    /// IPv4 fragments (first or not) and IPv6 fragment headers: passed to the stack.
    Fragment = 6,
    /// IPv6 with extension headers: passed to the stack.
    Ipv6ExtHeader = 7,
    /// Not IP, or IP but neither TCP nor UDP.
    NotTcpUdp = 8,
    /// TCP/UDP that matched no VIP and no reverse-NAT entry.
    NotForUs = 9,
    ConntrackHit = 10,
    ConntrackMiss = 11,
    /// VIP matched but no backend could be chosen: dropped.
    NoBackend = 12,
    /// `bpf_fib_lookup` found no usable next hop (no route, no neighbour yet, forwarding
    /// off): the translated packet went to the stack.
    NextHopFailure = 13,
    /// Replies rewritten back to the VIP.
    ReverseNat = 14,
    /// TTL/hop limit would expire here: passed to the stack, which answers with ICMP.
    TtlExpired = 15,
    /// Connection-table insertion failed (should not happen with an LRU map).
    ConntrackInsertFailed = 16,
    /// Translated packets handed to the stack to forward (a next hop behind a bridge, a
    /// VLAN-tagged flow, an egress outside the redirect map, or a next-hop failure).
    ViaStack = 17,
    /// ICMP errors about a balanced flow, translated and sent on to the other end of it
    /// (see `icmp`); other ICMP counts as `NotTcpUdp`.
    IcmpTranslated = 18,
    /// Client packets to a tunnelled backend that would no longer fit the route's MTU once
    /// encapsulated: answered with ICMP fragmentation-needed / packet-too-big.
    TooBigForTunnel = 19,
}

impl Counter {
    pub const COUNT: u32 = 20;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::ActionAborted,
        Self::ActionDrop,
        Self::ActionPass,
        Self::ActionTx,
        Self::ActionRedirect,
        Self::Malformed,
        Self::Fragment,
        Self::Ipv6ExtHeader,
        Self::NotTcpUdp,
        Self::NotForUs,
        Self::ConntrackHit,
        Self::ConntrackMiss,
        Self::NoBackend,
        Self::NextHopFailure,
        Self::ReverseNat,
        Self::TtlExpired,
        Self::ConntrackInsertFailed,
        Self::ViaStack,
        Self::IcmpTranslated,
        Self::TooBigForTunnel,
    ];

    /// Stable snake_case name, used in `xlb stats`, JSON output and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::ActionAborted => "xdp_aborted",
            Self::ActionDrop => "xdp_drop",
            Self::ActionPass => "xdp_pass",
            Self::ActionTx => "xdp_tx",
            Self::ActionRedirect => "xdp_redirect",
            Self::Malformed => "malformed",
            Self::Fragment => "fragment",
            Self::Ipv6ExtHeader => "ipv6_ext_header",
            Self::NotTcpUdp => "not_tcp_udp",
            Self::NotForUs => "not_for_vip",
            Self::ConntrackHit => "conntrack_hit",
            Self::ConntrackMiss => "conntrack_miss",
            Self::NoBackend => "no_backend",
            Self::NextHopFailure => "next_hop_failure",
            Self::ReverseNat => "reverse_nat",
            Self::TtlExpired => "ttl_expired",
            Self::ConntrackInsertFailed => "conntrack_insert_failed",
            Self::ViaStack => "via_stack",
            Self::IcmpTranslated => "icmp_translated",
            Self::TooBigForTunnel => "too_big_for_tunnel",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and byte arrays, and
    // have every padding byte spelled out as a field.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::CachedHop {}
    unsafe impl aya::Pod for super::ReverseNat {}
    unsafe impl aya::Pod for super::TrafficCounters {}
    unsafe impl aya::Pod for super::BenchFrame {}
    unsafe impl aya::Pod for super::EndpointVip {}
    unsafe impl aya::Pod for super::EncapSettings {}
    unsafe impl aya::Pod for crate::flow_table::FlowSet {}
    unsafe impl aya::Pod for crate::flow_table::SetMultipliers {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn mac_words_are_the_macs_bytes() {
        let hop = NextHop {
            ifindex: 7,
            src_mac: [0x12, 0x13, 0x14, 0x15, 0x16, 0x17],
            dst_mac: [0x02, 0x03, 0x04, 0x05, 0x06, 0x07],
        };
        let w = hop.mac_words();
        let mut bytes = [0u8; 12];
        for (i, word) in w.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [
                0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17
            ],
            "destination, then source"
        );
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 16 + 2 + 1 + 5);
        assert_eq!(size_of::<VipInfo>(), 16);
        assert_eq!(size_of::<Backend>(), 16 + 2 + 1 + 1 + 4 + 24 + 4 + 1 + 3);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<NextHop>(), 4 + 6 + 6);
        assert_eq!(size_of::<FlowState>(), 4 + 1 + 3 + 8 + 16);
        assert_eq!(size_of::<CachedHop>(), 16 + 8 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<EncapSettings>(), 4 + 2 + 2 + 16);
        assert_eq!(size_of::<EndpointVip>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<ReverseNat>(), 16 + 2 + 2 + 4 + 16);
        assert_eq!(size_of::<TrafficCounters>(), 24);
    }

    fn flow(closing: u8, last_seen_s: u64) -> FlowState {
        FlowState {
            closing,
            last_seen_ns: last_seen_s * NS_PER_S,
            ..FlowState::default()
        }
    }

    #[test]
    fn a_backend_entry_serves_only_its_vip_family_and_state() {
        let b = Backend {
            family: 4,
            flags: BACKEND_DRAINING,
            vip_id: 7,
            ..Backend::default()
        };
        assert!(b.serves(7, false, BACKEND_ACTIVE | BACKEND_DRAINING));
        assert!(
            !b.serves(7, false, BACKEND_ACTIVE),
            "draining takes no new flow"
        );
        assert!(
            !b.serves(8, false, BACKEND_DRAINING),
            "an id reused by another VIP"
        );
        assert!(!b.serves(7, true, BACKEND_DRAINING), "another family");
        assert!(!Backend::default().serves(0, false, BACKEND_ACTIVE | BACKEND_DRAINING));
    }

    /// A packet to `vip` as the parser leaves it.
    fn packet_to(vip: &VipKey) -> Parsed {
        Parsed {
            dst: vip.addr,
            dport_be: vip.port_be,
            proto: vip.proto,
            ..Parsed::EMPTY
        }
    }

    #[test]
    fn an_entry_holds_a_flow_only_to_the_vip_its_backend_serves() {
        let vip = VipKey::new("192.0.2.10:80".parse().unwrap(), crate::IPPROTO_TCP);
        let b = Backend {
            family: 4,
            flags: BACKEND_DRAINING,
            vip,
            ..Backend::default()
        };
        assert!(b.holds_flow_of(&packet_to(&vip), BACKEND_ACTIVE | BACKEND_DRAINING));
        assert!(
            !b.holds_flow_of(&packet_to(&vip), BACKEND_ACTIVE),
            "draining: established only"
        );
        for other in [
            VipKey::new("192.0.2.11:80".parse().unwrap(), crate::IPPROTO_TCP),
            VipKey::new("192.0.2.10:81".parse().unwrap(), crate::IPPROTO_TCP),
            VipKey::new("192.0.2.10:80".parse().unwrap(), crate::IPPROTO_UDP),
            VipKey::new(
                "[::ffff:192.0.2.10]:80".parse().unwrap(),
                crate::IPPROTO_TCP,
            ),
            VipKey::new("[2001:db8::10]:80".parse().unwrap(), crate::IPPROTO_TCP),
        ] {
            let packet = packet_to(&other);
            assert_eq!(VipKey::of_packet(&packet), other);
            let held = b.holds_flow_of(&packet, BACKEND_ACTIVE | BACKEND_DRAINING);
            assert_eq!(held, other == vip, "{other:?}");
        }
        assert!(
            !Backend::default().holds_flow_of(
                &packet_to(&VipKey::default()),
                BACKEND_ACTIVE | BACKEND_DRAINING
            ),
            "an unused slot holds nothing"
        );
    }

    #[test]
    fn ring_slots_fall_in_the_live_half_and_an_empty_ring_has_none() {
        let vip = VipInfo {
            vip_id: 1,
            ring_base: 3 * 17,
            ring_size: 17,
            idle_timeout_s: 0,
        };
        for hash in [0, 1, 16, 17, u32::MAX] {
            let slot = vip.ring_slot(hash).expect("a live ring");
            assert!((51..68).contains(&slot), "{hash} -> {slot}");
        }
        assert_eq!(
            VipInfo {
                ring_size: 0,
                ..vip
            }
            .ring_slot(5),
            None
        );
    }

    #[test]
    fn the_handshake_table_scales_with_the_connection_table() {
        assert_eq!(handshake_entries(CONNTRACK_ENTRIES), CONNTRACK_ENTRIES / 2);
        assert_eq!(handshake_entries(1024), HANDSHAKE_ENTRIES_MIN);
    }

    #[test]
    fn a_handshake_record_holds_for_the_handshake_timeout() {
        let record = flow(0, 1000);
        let end = (1000 + u64::from(HANDSHAKE_TIMEOUT_S)) * NS_PER_S;
        assert!(record.is_recent_handshake(end));
        assert!(!record.is_recent_handshake(end + 1));
        assert!(
            record.is_recent_handshake(999 * NS_PER_S),
            "written on another CPU a tick ahead"
        );
        let mut consumed = record;
        consumed.consume();
        assert!(!consumed.is_recent_handshake(1000 * NS_PER_S));
        assert!(!consumed.is_recent_handshake(0), "even right after boot");
    }

    #[test]
    fn a_reply_key_is_the_flow_turned_around_at_the_backend() {
        let key = FlowKey::reply([1; 16], 80u16.to_be(), [2; 16], 40000u16.to_be(), 6);
        assert_eq!((key.src, key.dst), ([1; 16], [2; 16]));
        assert_eq!(
            (key.sport_be, key.dport_be),
            (80u16.to_be(), 40000u16.to_be())
        );
    }

    #[test]
    fn a_connection_closes_on_a_reset_or_on_fins_from_both_sides() {
        assert!(!flow(0, 0).is_closing());
        assert!(
            !flow(CLOSE_FIN_FROM_CLIENT, 0).is_closing(),
            "half-closed by the client"
        );
        assert!(
            !flow(CLOSE_FIN_FROM_BACKEND, 0).is_closing(),
            "half-closed by the backend"
        );
        assert!(flow(CLOSE_FIN_FROM_CLIENT | CLOSE_FIN_FROM_BACKEND, 0).is_closing());
        assert!(flow(CLOSE_RESET, 0).is_closing());
        assert!(flow(CLOSE_RESET | CLOSE_FIN_FROM_CLIENT, 0).is_closing());
    }

    #[test]
    fn entries_expire_after_their_idle_or_closing_timeout() {
        let s = NS_PER_S;
        let open = flow(0, 1000);
        assert!(open.is_current(1000 * s, 30));
        assert!(
            open.is_current(1030 * s, 30),
            "exactly the timeout still holds"
        );
        assert!(!open.is_current(1030 * s + 1, 30));
        assert!(open.is_current(u64::MAX, 0), "0: no idle timeout");
        assert!(
            open.is_current(999 * s, 30),
            "last seen a tick in the future (another CPU): age 0"
        );
        let closed = flow(CLOSE_RESET, 1000);
        let closing_end = (1000 + u64::from(CLOSING_TIMEOUT_S)) * s;
        assert!(closed.is_current(closing_end, 300));
        assert!(!closed.is_current(closing_end + 1, 300));
        assert!(
            !closed.is_current(closing_end + 1, 0),
            "closing ends entries even without an idle timeout"
        );
        assert!(!closed.is_live(1000 * s, 300), "a closing flow is not live");
        assert!(open.is_live(1000 * s, 300));
        assert!(!open.is_live(2000 * s, 300), "an idle flow is not live");
    }

    #[test]
    fn counter_table_is_dense_and_named_uniquely() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counter::COUNT as usize);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in map_names::ALL {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
        }
    }
}
