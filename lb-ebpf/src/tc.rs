//! The TC hook (tcx ingress): socket buffers, after GRO, with whatever checksum state the
//! sender left. Where XDP cannot go without losing packets (veths from local senders, whose
//! segments are GSO-sized with checksums the stack has only begun; bridges), this hook sees
//! the same traffic as one large buffer per burst and hands it on with `bpf_redirect`, which
//! leaves segmentation and checksum completion to the egress device.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::{
        bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_tail, bpf_skb_pull_data,
    },
    programs::TcContext,
};
use lb_common::{
    Counter,
    csum::CsumDelta,
    parse::{Parsed, Skip, parse_into},
};

use crate::{
    forward::{Translation, next_hop},
    hook::{Hook, Room},
    maps::HopCache,
    nat::{decrement_ttl_skb, rewrite_skb, update_icmp_checksum_skb, update_ipv4_checksum_skb},
    packet::Packet,
    stats::count,
};

// The kernel's TC verdicts are ints; the shared path speaks u32 like XDP's actions.
const OK: u32 = TC_ACT_OK as u32;
const SHOT: u32 = TC_ACT_SHOT as u32;

/// Enough for every header the parser reads: Ethernet, one VLAN tag, IPv4 with options or
/// IPv6, and the L4 header up to its checksum.
const HEADERS_MAX: u32 = 14 + 4 + 60 + 20;

#[inline(always)]
fn skb(ctx: &TcContext) -> *mut __sk_buff {
    ctx.as_ptr().cast()
}

/// Makes the headers directly readable. Buffers from a local sender or a GRO merge may keep
/// only part of them in the linear head; pulling costs a helper call, so only those pay it.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) {
    pull(ctx, HEADERS_MAX);
}

/// Makes the first `len` bytes (at most the packet's) directly readable.
#[inline(always)]
fn pull(ctx: &TcContext, len: u32) {
    let want = ctx.len().min(len);
    if (ctx.data_end() - ctx.data()) < want as usize {
        // SAFETY: skb is this run's context. A failure leaves the head as it was and the
        // parser then passes the packet as too short.
        unsafe { bpf_skb_pull_data(skb(ctx), want) };
    }
}

impl Hook for TcContext {
    const PASS: u32 = OK;
    const DROP: u32 = SHOT;

    #[inline(always)]
    fn packet(&self) -> Packet {
        Packet::of_skb(self)
    }

    // Not inlined: the TC call chain's frames are larger, and with the parser's stack under
    // them they pass the verifier's 512 bytes (see `Hook::parse`).
    #[inline(never)]
    fn parse(&self, out: &mut Parsed) -> Result<(), Skip> {
        parse_into(&self.packet(), out)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context points at the kernel's __sk_buff for this run.
        unsafe { (*skb(self)).ingress_ifindex }
    }

    #[inline(always)]
    fn wire_len(&self) -> u64 {
        u64::from(self.len())
    }

    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*skb(self)).vlan_present != 0 }
    }

    #[inline(always)]
    fn fib_tot_len(&self, _p: &Parsed) -> u16 {
        // The kernel then checks the buffer against the egress MTU itself, and knows that
        // a GSO buffer leaves as segments that fit.
        0
    }

    #[inline(always)]
    fn make_readable(&self, len: u32) {
        pull(self, len);
    }

    #[inline(always)]
    fn update_ipv4_checksum(&self, offset: usize, delta: CsumDelta) -> Option<()> {
        update_ipv4_checksum_skb(self, offset, delta)
    }

    #[inline(always)]
    fn update_icmp_checksum(
        &self,
        offset: usize,
        delta: CsumDelta,
        ipv6_pseudo_header: bool,
    ) -> Option<()> {
        update_icmp_checksum_skb(self, offset, delta, ipv6_pseudo_header)
    }

    #[inline(always)]
    fn length_to_fit(&self, p: &Parsed) -> Option<u32> {
        // SAFETY: the context points at the kernel's __sk_buff for this run.
        if unsafe { (*skb(self)).gso_size } != 0 {
            return None;
        }
        Some(self.len() - p.l3_offset as u32)
    }

    #[inline(always)]
    fn open_room(&self, len: u16, room: Room) -> Option<()> {
        // A tunnel's flags make a GSO buffer's segments leave as tunnel packets, each cut
        // shorter by the tunnel's length (the helper lowers the segment size).
        let flags = match room {
            Room::Tunnel { ipv6, udp } => {
                u64::from(if ipv6 {
                    BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
                } else {
                    BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
                }) | if udp {
                    u64::from(BPF_F_ADJ_ROOM_ENCAP_L4_UDP)
                } else {
                    0
                }
            }
            Room::IcmpError => 0,
        };
        // SAFETY: skb is this run's context; the helper checks the length and the headroom.
        let rc = unsafe { bpf_skb_adjust_room(skb(self), i32::from(len), BPF_ADJ_ROOM_MAC, flags) };
        (rc == 0).then_some(())
    }

    #[inline(always)]
    fn truncate(&self, len: u32) -> Option<()> {
        if self.len() <= len {
            return Some(());
        }
        // SAFETY: skb is this run's context.
        (unsafe { bpf_skb_change_tail(skb(self), len, 0) } == 0).then_some(())
    }

    #[inline(always)]
    fn send_out(&self, ifindex: u32) -> Option<u32> {
        // SAFETY: a helper taking plain integers; it only records the target.
        Some(unsafe { bpf_redirect(ifindex, 0) as u32 })
    }

    // Not inlined: shared by both directions, in its own stack frame.
    #[inline(never)]
    fn emit(&self, p: &Parsed, t: &Translation, cache: HopCache) -> u32 {
        let next_hop = next_hop(self, p, t, cache);
        let Some(nh) =
            next_hop.filter(|_| p.l3_offset == lb_common::parse::ETH_HLEN && !self.vlan_tagged())
        else {
            return via_stack(self, p, t);
        };
        if p.ttl <= 1 {
            // Untouched: the stack sends the ICMP time-exceeded.
            count(Counter::TtlExpired);
            return OK;
        }
        let translated = if t.already_translated {
            decrement_ttl_skb(self, p)
        } else {
            rewrite_skb(self, p, t.endpoint, t.addr_words(), t.port_be, true)
        };
        // The checksum helpers move the data: the MACs are written through a fresh view.
        if translated.is_none() || Packet::of_skb(self).write_mac_words(nh.macs).is_none() {
            return dropped_malformed();
        }
        self.send_out(nh.ifindex).unwrap_or(SHOT)
    }
}

/// Translates the packet and lets the stack route it (TTL and MACs are the stack's job).
#[inline(always)]
fn via_stack(ctx: &TcContext, p: &Parsed, t: &Translation) -> u32 {
    count(Counter::ViaStack);
    if t.already_translated {
        return OK;
    }
    match rewrite_skb(ctx, p, t.endpoint, t.addr_words(), t.port_be, false) {
        Some(()) => OK,
        None => dropped_malformed(),
    }
}

#[inline(always)]
fn dropped_malformed() -> u32 {
    count(Counter::Malformed);
    SHOT
}
